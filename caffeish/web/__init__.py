"""The web app of `caffeish serve`: a local site over a workspace folder (models, datasets).

A face beside tools/: its routes (app) call the same library functions as the CLI (pages ->
caffeish.apps), over the paths the workspace allows (workspace), with long work in threads that
report the library's progress bars (tasks), and pictures from Graphviz and matplotlib (pictures).
Needs the `web` extra: pip install 'caffeish[web]'.
"""
