(function () {
  "use strict";
  var body = document.body;
  var baseline = document.getElementById("baseline-select");
  if (baseline) {
    baseline.addEventListener("change", function () { body.setAttribute("data-baseline", baseline.value); });
  }
  var table = document.getElementById("case-table");
  var count = document.getElementById("case-count");
  if (!table || !count) { return; }
  var rows = Array.prototype.slice.call(table.tBodies[0].rows);
  var pick = function (id) { return document.getElementById(id); };
  var model = pick("f-model"), stratum = pick("f-stratum"), persona = pick("f-persona");
  var disagree = pick("f-disagree"), wrong = pick("f-wrong");
  var matches = function (select, value) { return !select || !select.value || select.value === value; };
  function apply() {
    var shown = 0;
    rows.forEach(function (row) {
      var keep = matches(model, row.getAttribute("data-model")) &&
        matches(stratum, row.getAttribute("data-stratum")) &&
        matches(persona, row.getAttribute("data-persona")) &&
        (!disagree || !disagree.checked || row.getAttribute("data-disagree") === "1") &&
        (!wrong || !wrong.checked || row.classList.contains("wrong"));
      row.hidden = !keep;
      if (keep) { shown += 1; }
    });
    count.textContent = "Showing " + shown + " of " + rows.length + " answers";
  }
  [model, stratum, persona, disagree, wrong].forEach(function (control) {
    if (control) { control.addEventListener("change", apply); }
  });
  apply();
})();
