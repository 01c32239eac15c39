"""What surrounds a run: the entry point's exit statuses (`entry`), a sweep job's record (`job`), the end of
a multirun and Ray's per-job resources (`sweep`), and the sweep report read back from files (`report`)."""
