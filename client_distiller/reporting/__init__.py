"""What runs report: accuracy and result records (``evaluate``), mean ± standard error tables
(``tables``), the deployed student's cost and plots (``student_cost``), the machine a result was
measured on (``machine``) and the command line that reproduces it (``command_line``), and the
protection sweep's report and per-mode measures (``sweep_report``, ``protection_measures``)."""
