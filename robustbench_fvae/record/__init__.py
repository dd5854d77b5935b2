"""The run record: the on-disk contract read by reports, sweeps, notebooks and outside tools.

* :mod:`.io` — atomic writers, JSON lines, locks (also used by the data caches);
* :mod:`.schema` — the record's files, declared once, and their readers and writers;
* :mod:`.store` — where a run lives, its done marker and lock, and :func:`.store.run_job`;
* :mod:`.view` — a typed reader of one run (finished, derived, algorithm, settings, selection);
* :mod:`.derived` — what a derived run (DFR) says of itself: its label, group labels, command.

Nothing here imports torch. Submodules are imported by name (``from robustbench_fvae.record
import store``) so that importing one does not import the others.
"""
