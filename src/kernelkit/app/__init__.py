"""The thin top: the command line (`cli`), the failure policy and exit codes (`failure`), one launch
path for a process or ranks (`launch`), the jobs (`train_job`, `infer_job`, `blend_job`, `dry_run`), checkpoint-to-submission
(`predictor`), the files a run leaves (`outputs`, `train_reports`) and the generated demo (`demo`).
Nothing imports `app`."""
