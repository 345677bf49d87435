"""`llava-ray report`: what a run or a pipeline did, as PNG plots tied together by an index.html.

sources.py reads a run dir or a pipeline root into plain data, plots.py draws it (matplotlib, Agg), page.py writes
the figures and the page.
"""
