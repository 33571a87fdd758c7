"""The protection sweep (`client-distill experiment`): what each vendor protection mode costs a
distilling client.

Sweeps protection modes x budgets x seeds against a vendor it starts itself (`LocalVendor`: a real
`vendor-api serve` process on 127.0.0.1 with its own embedded Redis; the offline demo teacher, or
any open_clip spec with `--teacher`), on the offline benchmark or any DomainBed-layout `--data`.

Cost accounting. One key per (mode, seed), with a quota of the largest budget, one ledger and one
cache folder per (mode, seed). Budgets run in ascending order and each buys a *prefix* of one
seeded buying order (class prompts first, then images), so a larger budget reuses every answer of
the smaller ones from the cache and pays only for the rest: `units_spent` of a run is what the key
has paid for that run's targets (its ledger's settled total), `units_new` what this run added.
Caches are per (mode, seed) on purpose: `none` answers are key-independent, and sharing them
between seeds would make the second seed's targets look free.

Per run: the student's OOD (held-out domain) and ID accuracy, fidelity (mean cosine between its
projected embeddings and the clean teacher's on the test-domain images, bought once through a
separate `none` key), and mode-specific measurements from :data:`MODE_MEASURES` (watermark
p-value via `vendor-admin verify-watermark`, b4b coverage and noise from `/v1/usage`).

Resumable: a run whose (mode, budget, seed) row is in `runs.csv` is skipped, keys are kept in
`keys.json`, purchases come back from the cache, so a rerun of a finished sweep costs 0 units.

Modules: ``config`` (the frozen `SweepConfig`, defaults, checks, the reproducing command line),
``vendor_state`` (the sweep vendor's secret, calibration images and kept API keys), ``runner``
(buy, distil, measure, report).
"""
