"""Scaling studies: a study file (configs/studies/*.yaml) → one training run per point → results.csv, report.md, plots.

    colorize-dist study run smoke --local          # every point, one after another, then the report
    colorize-dist study run node_ladder data.shards=/data/ffhq --partition gpu --time 24:00:00
    colorize-dist study report node_ladder         # results.csv, report.md and plots/ from what the runs wrote

Modules: `config` (the study file's schema), `plan` (points → resolved training configs and run dirs), `costs`
(parameters, training FLOPs, budgets, MFU), `local` and `cluster` (running points here or as Slurm job arrays),
`status` (what each point's run dir says about it), `collect` (one row of results per point), `plots`,
`run` and `report` (the two commands) and `command` (what their command lines share).
"""
