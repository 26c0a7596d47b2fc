# The two entry points of the README; both work on a fresh Debian/Ubuntu with Python 3.11+.
.PHONY: run test bench docs

run:  ## venv + install, development keys, relay on 127.0.0.1:9443
	sh scripts/dev.sh run

test:  ## install test needs (redis-server via apt when absent), lint, type-check, run the suite
	sh scripts/dev.sh test

bench:  ## the standard benchmark set, < 10 min (benches/results/*.json + summary-<UTC>.md)
	.venv/bin/python -m benches standard

docs:  ## regenerate docs/configuration.md from rescue/config.py
	.venv/bin/beach-rescue config docs > docs/configuration.md
