"""Sub-commands of ``trackflow`` beyond the pipeline's stages, one module each.

A module here offers ``add_arguments(parser)`` and ``run(args)`` and its docstring's first line is
its help; ``trackflow.cli`` finds it by itself. Heavy imports stay inside ``run``: building the
parser imports every module here.
"""
