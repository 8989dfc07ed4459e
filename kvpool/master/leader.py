"""Leader election among masters that share a Redis: a lease with a fencing epoch.

Protocol (all steps are Lua scripts, so each is atomic in Redis):

* ``PREFIX:leader`` holds ``"EPOCH ADDRESS"`` of the leader, with a TTL (``--lease-ttl``,
  default 3 s). The leader renews it every third of the TTL.
* A master without the lease tries to take it every ``poll`` seconds. It wins only when the
  key is absent (the leader stopped renewing); it then sets ``PREFIX:epoch`` to one more
  than the highest epoch anyone has seen (Redis's, and its own memory of the last leader's,
  so that a Redis that restarted empty cannot make epochs go backwards).
* Everything a master writes to Redis is checked against ``PREFIX:epoch``
  (:mod:`kvpool.master.metastore`), and every request it sends a node carries its epoch:
  nodes remember the highest they have seen and refuse anything older. Nodes also make a new
  data-plane key when they register with the new leader, so grants and leases the old leader
  signed stop working on them at once.
* A leader whose process was stopped (SIGSTOP, a long pause) cannot know whether it still
  leads: when more than a TTL passed since its last renewal attempt finished, it refuses
  every request until the next attempt says. If Redis holds another leader, it is deposed.
  A leader that merely cannot reach Redis keeps serving: no other master can take the lease
  from that Redis either, and nodes fence any that did.
"""

from __future__ import annotations

import asyncio
import logging
import time

__all__ = ["LeaderLease"]

log = logging.getLogger("kvpool.leader")

# KEYS: leader, epoch. ARGV: address, ttl ms, the highest epoch this master has seen, and
# "1" to take the lease even from a Redis that lost its epoch. {1, value}: taken; {0, value}:
# held by value; {2, ''}: Redis has no epoch although one was seen (it restarted empty).
_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held then return {0, held} end
local stored = redis.call('GET', KEYS[2])
if not stored and tonumber(ARGV[3]) > 0 and ARGV[4] ~= '1' then return {2, ''} end
local epoch = math.max(tonumber(stored or '0'), tonumber(ARGV[3])) + 1
redis.call('SET', KEYS[2], epoch)
local value = epoch .. ' ' .. ARGV[1]
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {1, value}
"""

# KEYS: leader, epoch. ARGV: "EPOCH ADDRESS", ttl ms, epoch. 1: renewed; 2: renewed in a
# Redis that had lost everything (it restarted empty); else the lease's value ("EPOCH ADDRESS"
# of another leader, or "" if none holds it now).
_RENEW = """
local held = redis.call('GET', KEYS[1])
local epoch = redis.call('GET', KEYS[2])
if held == ARGV[1] and epoch == ARGV[3] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not held and (not epoch or epoch == ARGV[3]) then
  -- Redis restarted empty (or the key just lapsed with nobody else in): take it back.
  redis.call('SET', KEYS[2], ARGV[3])
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  if not epoch then return 2 end
  return 1
end
return held or ''
"""


class LeaderLease:
    def __init__(self, redis, prefix: str, address: str, *, ttl: float = 3.0, poll: float = 0.25,
                 clock=time.monotonic) -> None:
        self.redis = redis
        self.address = address
        self.ttl = ttl
        self.poll = poll
        self.clock = clock
        self.keys = [f"{prefix}:leader", f"{prefix}:epoch"]
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self.epoch = 0
        self.seen_epoch = 0
        self.leader_address = ""
        self.leading = False
        self.deposed = asyncio.Event()
        self._last_check = clock()
        # When the last renewal that Redis accepted was sent (its TTL runs from about then).
        self._renewed_at = clock()
        #: Told when a renewal cannot reach Redis (``on_error(why)``) and when Redis turns out
        #: to have restarted empty (``on_reset()``): the metadata store then writes it all again.
        self.on_error = None
        self.on_reset = None

    def _value(self) -> str:
        return f"{self.epoch} {self.address}"

    def _note_leader(self, value: bytes | str) -> None:
        text = value.decode() if isinstance(value, bytes) else value
        epoch, _, address = text.partition(" ")
        self.leader_address = address
        self.seen_epoch = max(self.seen_epoch, int(epoch))

    async def acquire(self) -> None:
        """Wait until this master leads; meanwhile keep ``leader_address`` current.

        A Redis that restarted empty has no lease and no epoch, although the leader may be
        alive: a standby then waits one TTL, in which a live leader takes its lease back
        (:meth:`renew`), before it takes the lease itself.
        """
        emptied_at = None
        while True:
            try:
                force = emptied_at is not None and self.clock() - emptied_at >= self.ttl
                attempt = self.clock()
                won, value = await self._acquire(keys=self.keys, args=[self.address, int(self.ttl * 1000),
                                                                       self.seen_epoch, "1" if force else "0"])
                if won == 2:
                    emptied_at = emptied_at if emptied_at is not None else self.clock()
                    await asyncio.sleep(self.poll)
                    continue
                emptied_at = None
                self._note_leader(value)
                if won:
                    self.epoch = self.seen_epoch
                    self.leading = True
                    self._last_check, self._renewed_at = self.clock(), attempt
                    log.info("leading with fencing epoch %d", self.epoch)
                    return
            except Exception as exc:  # Redis down: nobody can take the lease; keep trying
                log.debug("lease acquisition failed: %s", exc)
            await asyncio.sleep(self.poll)

    def valid(self) -> bool:
        """Whether this master may serve now (see the module docstring)."""
        return self.leading and self.clock() - self._last_check < self.ttl

    async def keep(self) -> None:
        """Renew forever; returns when another master holds the lease (deposed)."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            if not await self.renew():
                return

    def fresh(self) -> bool:
        """Whether the lease was renewed in Redis within the last two thirds of its TTL (a
        leader renews every third): no other master can have taken it for a third of a TTL
        yet. ``--redis-commit sent`` answers a commit before Redis's reply only then."""
        return self.leading and self.clock() - self._renewed_at < self.ttl * 2 / 3

    async def renew(self) -> bool:
        started = self.clock()
        try:
            ok = await self._renew(keys=self.keys, args=[self._value(), int(self.ttl * 1000), self.epoch])
        except Exception as exc:
            # Unreachable Redis: keep leading (see the module docstring), but note the attempt.
            log.debug("lease renewal failed: %s", exc)
            self._last_check = self.clock()
            if self.on_error is not None:
                self.on_error(f"{type(exc).__name__}: {exc}")
            return True
        if ok in (1, 2):
            self._last_check = self.clock()
            self._renewed_at = started
            if ok == 2 and self.on_reset is not None:
                self.on_reset()
            return True
        if ok:
            self._note_leader(ok)
        else:
            self.leader_address = ""
        self.step_down(f"the lease is held by {self.leader_address or 'nobody'} now")
        return False

    async def confirm(self) -> bool:
        """Whether this master leads, asking Redis first if it cannot tell (after a pause)."""
        if self.leading and not self.valid():
            await self.renew()
        return self.valid()

    def step_down(self, why: str) -> None:
        if self.leading:
            log.warning("deposed (epoch %d): %s; refusing every request from now on", self.epoch, why)
        self.leading = False
        self.deposed.set()
