"""Pipeline stages: thin entry points doing I/O around the library's pure functions.

Each stage module offers ``add_arguments(parser)``, ``run(args)`` and ``main(argv)``, so it runs
as ``python -m trackflow.stages.<name>`` (how ``dvc.yaml`` calls it) or as ``trackflow <name>``.
Every path comes from the command line; the params file is validated once, at the start of ``run``,
before any work. Their command-line plumbing is :mod:`trackflow.cli_support`'s.
"""

STAGES = ("ingest", "split", "preprocess", "pretrain", "train", "evaluate", "anomaly", "register")
