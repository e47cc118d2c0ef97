"""`hyena-glt plan`: which layout to train a config with on N devices, before paying for it.

    memory.py     per-rank memory by formula (also `train --dry-run`'s)
    hardware.py   hardware profiles: small YAML files (configs/hardware/), `hyena-glt calibrate` writes the CPU one
    cost.py       the step-time model: compute per layer kind, communication per collective and link, bubble
    search.py     every valid layout of a config on N devices, ranked; why each rejected one fails
    calibrate.py  `hyena-glt calibrate`: this machine's profile, measured
    measure.py    training runs measured for the planner (calibrate, bench plan, tests/plan)
    commands.py   the `plan` and `calibrate` subcommands

docs/planning.md states the model, the profiles and the validation tables (`bench plan`).
"""
