"""What people read: the run summary, the terminal tables and the HTML report."""
