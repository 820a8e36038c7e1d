"""The load generator's default bounds, apart from it so the CLI can show them without loading it.

Every live run ends within its duration (plus ``live.loadgen.SEND_GRACE_S``) and a bounded drain, whatever
rate is asked:

* ``DEFAULT_MAX_IN_FLIGHT``: requests the generator keeps outstanding at most (``--max-in-flight``; wrk2's
  connections, k6's ``maxVUs``). A balancer that answers every request within its timeout holds at most
  the rate times that timeout: 168/s x 30 s = 5,040 for the seed scenario at 70% load however overloaded a
  node is, so the default never binds there; it stays within this machine's open-file limit (20,000).
* ``DEFAULT_DRAIN_S``: seconds the generator waits for the responses still outstanding once the duration is
  over (``--drain``); what has not come back by then is recorded as a timeout.
"""

DEFAULT_MAX_IN_FLIGHT = 10_000
DEFAULT_DRAIN_S = 10.0
