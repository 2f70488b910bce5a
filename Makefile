# mgpumanager: `make demo` and `make test` are all a newcomer needs; each makes .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= mrock
# The server's Python, as the launcher, the config check and the byte-compile there run it.
HOST_PYTHON ?= /usr/bin/python3
# The staging folder on HOST (the tests point it elsewhere).
STAGE  ?= /tmp/mgpumanager-deploy
CONFIG ?= consumers.yaml

.PHONY: demo test test-debian test-real lint fuzz bench run check deploy clean

# (A venv that venv left half made, without pip: Debian without python3-venv, is made anew.)
$(STAMP): requirements.txt requirements-dev.txt
	$(BIN)/python -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

# The tests on what Debian 13 ships (requirements-debian13.txt), as the server runs the broker: its Python
# 3.13 (DEBIAN_PYTHON), its aiohttp 3.11, no uvloop. In .venv-debian13, made on first use.
DEBIAN_PYTHON ?= python3.13
DEBIAN_VENV   := .venv-debian13
$(DEBIAN_VENV)/.installed: requirements-debian13.txt requirements-dev.txt
	$(DEBIAN_VENV)/bin/python -m pip --version >/dev/null 2>&1 \
	  || { rm -rf $(DEBIAN_VENV) && $(DEBIAN_PYTHON) -m venv $(DEBIAN_VENV); }
	$(DEBIAN_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
	  -r requirements-debian13.txt -r requirements-dev.txt
	touch $@

demo: $(STAMP)
	$(BIN)/python mgpusim.py demo

# The tests mostly wait (on sockets, subprocesses, a browser): TEST_WORKERS processes share them out
# (pytest-xdist), each taking the next test when it is free (docs/development.md, "Tests"). pytest keeps
# the test file as it rewrote it for its asserts (7 s of CPU, in every worker), even where the environment
# sets PYTHONDONTWRITEBYTECODE; one collection first rewrites it once (its errors show in the run after it).
TEST_WORKERS ?= 6
TESTS = PYTHONDONTWRITEBYTECODE= $(1)/python -m pytest -q --collect-only >/dev/null 2>&1; \
	PYTHONDONTWRITEBYTECODE= $(1)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal
test: $(STAMP)
	$(call TESTS,$(BIN))

test-debian: $(DEBIAN_VENV)/.installed
	$(call TESTS,$(DEBIAN_VENV)/bin)

# mgpumanager in front of real ComfyUI, whisper.cpp and llama.cpp servers on the CPU (docs/development.md):
# builds them into $$MGPU_REAL_CACHE on first use, then runs test_real.py. One scenario: ARGS="-k held".
test-real: $(STAMP)
	$(BIN)/python test_real.py install
	$(BIN)/python -m pytest -q -p no:cacheprovider -rxX --durations=0 test_real.py $(ARGS)

# The property tests (scheduler invariants, config loader) with fresh examples for FUZZ_SECONDS.
FUZZ_SECONDS ?= 600
fuzz: $(STAMP)
	MGPU_FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest -q -s -p no:cacheprovider -k test_fuzz

# Measures what the broker costs against direct access, nginx and a bare aiohttp proxy; writes BENCH.md.
bench: $(STAMP)
	$(BIN)/python bench.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

run: $(STAMP)
	$(BIN)/python mgpumanager.py --config $(CONFIG)

check: $(STAMP)
	$(BIN)/python mgpumanager.py --check --config $(CONFIG)

# The launcher on the server (/usr/local/bin/mgpumanager), for the command line and the unit alike: it runs
# the daemon's file as make deploy byte-compiled it. A script given by its path is compiled anew at every
# run: a verb starts twice as slowly, and the broker stays some 27 MiB larger for the rest of its life. (-P:
# no module is taken from the directory it is run in, as root under sudo too.)
define CLI_LAUNCHER
#!/bin/sh
# mgpumanager: the broker (the unit's ExecStart) and its command line, written by make deploy
# (docs/operations.md, "Deploying" and "The command line").
exec $(HOST_PYTHON) -P -c 'import runpy, sys; sys.path.insert(0, "/opt/mgpumanager"); runpy.run_module("mgpumanager", run_name="__main__")' "$$@"
endef
export CLI_LAUNCHER

# Copies the daemon, the config ($(CONFIG), as consumers.yaml), the unit, the README and the manual (docs/,
# beside the daemon: the unit's Documentation=), and the command line's launcher; creates the service's system user if it is missing; validates
# the config there, as that user (so a token file it cannot read is refused before anything is installed),
# before restarting; then waits for /healthz at the config's own listen address, as --check printed it
# (docs/operations.md, "Deploying").
# ssh -t: sudo on HOST may ask for its password.
deploy:
	ssh $(HOST) 'rm -rf $(STAGE) && mkdir -p -m 0700 $(STAGE)'
	scp -r mgpumanager.py mgpumanager.service README.md docs $(HOST):$(STAGE)/
	scp $(CONFIG) $(HOST):$(STAGE)/consumers.yaml
	printf '%s\n' "$$CLI_LAUNCHER" | ssh $(HOST) 'cat > $(STAGE)/mgpumanager-cli'
	ssh -t $(HOST) 'cd $(STAGE) \
	  && { id -u mgpumanager >/dev/null 2>&1 || sudo useradd --system --no-create-home \
	       --home-dir /nonexistent --shell /usr/sbin/nologin mgpumanager; } \
	  && sudo chgrp -R mgpumanager . && chmod -R g+rX,o-rwx . \
	  && sudo -u mgpumanager $(HOST_PYTHON) mgpumanager.py --check --config consumers.yaml > check.out \
	  && sudo install -D -m 0644 mgpumanager.py /opt/mgpumanager/mgpumanager.py \
	  && sudo $(HOST_PYTHON) -m py_compile /opt/mgpumanager/mgpumanager.py \
	  && sudo install -m 0755 mgpumanager-cli /usr/local/bin/mgpumanager \
	  && sudo install -D -m 0644 README.md /opt/mgpumanager/README.md \
	  && sudo rm -rf /opt/mgpumanager/docs && sudo install -d -m 0755 /opt/mgpumanager/docs \
	  && sudo install -m 0644 docs/* /opt/mgpumanager/docs/ \
	  && sudo install -D -m 0640 -g mgpumanager consumers.yaml /etc/mgpumanager/consumers.yaml \
	  && sudo install -D -m 0644 mgpumanager.service /etc/systemd/system/mgpumanager.service \
	  && sudo systemctl daemon-reload && sudo systemctl enable --quiet mgpumanager \
	  && sudo systemctl restart mgpumanager'
	ssh -t $(HOST) 'listen=$$(sed -n "s/^listen //p" $(STAGE)/check.out); host=$${listen%:*}; port=$${listen##*:}; \
	  case $$host in 0.0.0.0) host=127.0.0.1;; ::) host="[::1]";; *:*) host="[$$host]";; esac; \
	  for i in 1 2 3 4 5 6 7 8 9 10; do curl -fsS "http://$$host:$$port/healthz" && exit 0; sleep 1; done; \
	  sudo journalctl -u mgpumanager -n 30 --no-pager; exit 1'

clean:
	rm -rf $(VENV) $(DEBIAN_VENV) .pytest_cache .ruff_cache __pycache__
