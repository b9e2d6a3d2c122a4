"""The HTML report's colours: persona colours, persona-group colours and the heatmap's two ends."""

from __future__ import annotations

# Okabe-Ito colours (distinguishable with colour-vision deficiency); the baseline is dark grey.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#7F3C8D", "#8C6D31")
BASELINE_COLOUR = "#4D4D4D"
# Medical personas blue, non-medical orange (Okabe-Ito), the baseline dark grey; the group is written out too,
# so that nothing rests on colour alone.
GROUP_COLOUR = {"medical": "#0072B2", "non_medical": "#E69F00", "baseline": BASELINE_COLOUR}
OTHER_GROUP_COLOUR = "#999999"
# Heatmap cells: ranked above no persona shades to blue, below to vermillion, white at no difference.
HEAT_ABOVE = (0x00, 0x72, 0xB2)
HEAT_BELOW = (0xD5, 0x5E, 0x00)
