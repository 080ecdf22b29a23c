# Entry points on a fresh machine: `make demo` (main job) and `make test`.
# Every target creates/refreshes .venv first when the requirements changed (stamp file).
PY      := .venv/bin/python
STAMP   := .venv/.stamp
OUT     ?= runs

.PHONY: venv demo demo-sa demo-diffusion test bench clean

$(STAMP): requirements.txt requirements-nodeps.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

venv: $(STAMP)

# Part 1 on the embedded synthetic scenes: preview the data, train Slot Attention (cpu preset), evaluate.
demo: $(STAMP)
	$(PY) data.py --preview $(OUT)/data_preview.png --resolution 64
	$(PY) sa.py --preset cpu --out $(OUT)/sa

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/bench_data.py
	$(PY) bench/bench_ari.py
	$(PY) bench/bench_sa.py

clean:
	rm -rf $(OUT) .cache
