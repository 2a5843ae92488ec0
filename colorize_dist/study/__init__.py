"""Scaling studies: a study file (configs/studies/*.yaml) → one training run per point → results.csv, report.md, plots.

    colorize-dist study run smoke --local          # every point, one after another, then the report
    colorize-dist study run node_ladder data.shards=/data/ffhq --partition gpu --time 24:00:00
    colorize-dist study report node_ladder         # results.csv, report.md and plots/ from what the runs wrote

Modules, each importing only those before it: `config` (the study file's schema), `costs` (parameters, training
FLOPs, budgets, MFU), `plan` (points → resolved training configs and run dirs), `record` (what the study keeps
about each point: RUN/study.json, RUN/study.log), `local` and `cluster` (running points here or as Slurm job
arrays, and reading back how a launch ended), `status` (a point's state from those), `collect` (one row of
results per point), `plots`, `command` (what the command lines share), then the two commands, `report` and `run`.
"""
