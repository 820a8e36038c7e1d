"""The load generator's default bounds, apart from it so the CLI can show them without loading it.

Every live run ends within its duration (plus ``live.loadgen.SEND_GRACE_S``) and a bounded drain, whatever
rate is asked:

* ``DEFAULT_MAX_IN_FLIGHT``: requests the generator keeps outstanding at most (``--max-in-flight``; wrk2's
  connections, k6's ``maxVUs``). A balancer that answers every request within its timeout holds at most
  the rate times that timeout: 168/s x 30 s = 5,040 for the seed scenario at 70% load however overloaded a
  node is, so the default never binds there. It stays below the balancer's default connection cap
  (``--max-connections``: half the open-file limit less 256, 9,872 with this machine's 20,000), so at
  extreme overload the generator's own bound is the one that binds (counted as *not sent*), not the
  balancer's 503 ``too_many_connections``.
* the drain: seconds the generator waits for the responses still outstanding once the duration is over
  (``--drain``); what has not come back by then is recorded as a timeout. By default it is the scenario's
  balancer ``timeout_s`` plus ``DRAIN_MARGIN_S``: a balancer answers or times out every request within its
  timeout, so nothing is cut that the simulator (which waits as long) would count as answered. A shorter
  drain ends overloaded runs sooner and counts their tail as timeouts.
"""

DEFAULT_MAX_IN_FLIGHT = 8_192
DRAIN_MARGIN_S = 1.0


def default_drain_s(balancer_timeout_s: float) -> float:
    """The drain when ``--drain`` is not given: the balancer's timeout and a margin."""
    return balancer_timeout_s + DRAIN_MARGIN_S
