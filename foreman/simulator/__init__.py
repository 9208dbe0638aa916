"""The scheduling simulator: foreman's own policy on seeded traces, against two baselines.

The simulated worker is foreman's: one job at a time, a swap is a load that
takes the model's load time, and the pick is `foreman.scheduling.policy.Policy.pick`
driven by the daemon worker's own `foreman.scheduling.driver.PolicyDriver` (its `State`
and `CostBook` bookkeeping), on queues folded for aliases by `foreman.routing.aliases`
as the worker folds them. The clock is simulated, so a two-hour trace takes well under
a second. Pure code like the policy: no asyncio, aiohttp, sqlite3 or clock
(`tests/unit/test_layering.py` holds it).

- `traces`: the seeded workloads (`SimJob`, `Trace`, `TRACES`).
- `choosers`: what picks the next job: foreman's policy and the two baselines.
- `simulate`: the simulated worker, and the `Result` of a run.
- `checks`: the documented guarantees, checked job by job on a `Result`.

`bench/schedule.py` prints the report and draws the timeline from them, and runs
trace 1 through the real daemon.
"""
