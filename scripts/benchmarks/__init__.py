"""The sections of scripts/bench.py, one module each (run(ctx) -> Section), and common.py,
what they share. `python scripts/bench.py` puts scripts/ on sys.path, which makes this
package importable; see scripts/bench.py for the command."""
