"""Run rows of docs/errors.md through the real entry point, one after another in this one process:
`python tests/run/error_rows.py ROWS.json OUT.json`, ROWS a list of [folder, [arg, ...]].

Each row is `python -m llmtrain ARGS` as a user types it (Hydra's main, the callbacks, the one-line handler, the
exit status), run in its folder; what differs from a fresh process is only that the imports are paid once, which
keeps the table's 70 rows inside the test budget of a 2-core machine. OUT gets [exit status, stderr] per row."""

import contextlib
import io
import json
import os
import sys

from llmtrain import cli

rows_file, out_file = sys.argv[1:3]
rows, results = json.load(open(rows_file)), []
for folder, args in rows:
    os.chdir(folder)
    sys.argv = ["llmtrain", *args]
    err, status = io.StringIO(), 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli.main()
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # a crash: its traceback is what the row must never show
        import traceback

        err.write("Traceback (most recent call last):\n" + "".join(traceback.format_exception(e)))
        status = 1
    results.append([status, err.getvalue()])
with open(out_file, "w") as f:
    json.dump(results, f)
