"""Lua scripts that change the Redis presence store atomically.

Keys of one room (KEYS[1..3]), the room index (KEYS[4]) and, for JOIN and
RELEASE, the user's connections in every room (KEYS[5]):
  conns   sorted set: connection id scored by its expiry in milliseconds
  owners  hash: connection id to user key
  users   hash: user key to number of listed connections
  rooms   set: room keys that have listed connections
  user    sorted set: the user's connection ids in all rooms, scored like conns

REAP builds each user's key from the prefix in its arguments, so not every
key is declared. The scripts therefore need a single Redis server, not a Cluster.

The expiry comes from the Redis server's clock, so nodes whose clocks
disagree still agree on what has expired. Because each script runs alone, a
connection is removed once, and a user's count reaches zero once, however
many nodes reap at the same time; so exactly one node announces each leave.
"""

# Remove one connection; return the user key when it was their last one.
_REMOVE_CONNECTION = """
local function remove_connection(conn, room, user_key_prefix)
  if redis.call('ZREM', KEYS[1], conn) == 0 then return nil end
  local user = redis.call('HGET', KEYS[2], conn)
  redis.call('HDEL', KEYS[2], conn)
  if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('SREM', KEYS[4], room) end
  if not user then return nil end
  redis.call('ZREM', user_key_prefix .. user, conn)
  if redis.call('HINCRBY', KEYS[3], user, -1) <= 0 then
    redis.call('HDEL', KEYS[3], user)
    return user
  end
  return nil
end

local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
"""

# ARGV: connection id, user key, ttl in ms, room key, the maximum number of
# the user's unexpired connections in all rooms (0: no maximum).
# Lists or refreshes a connection. Returns 1 when it is the user's first in
# the room, -1 when a new connection would pass the maximum, and 0 otherwise.
JOIN = _REMOVE_CONNECTION + """
local now = now_ms()
local expiry = now + tonumber(ARGV[3])
local maximum = tonumber(ARGV[5])
if maximum > 0 and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCOUNT', KEYS[5], now, '+inf') >= maximum then return -1 end
end
redis.call('ZADD', KEYS[5], expiry, ARGV[1])
if redis.call('ZADD', KEYS[1], expiry, ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[4])
if redis.call('HINCRBY', KEYS[3], ARGV[2], 1) == 1 then return 1 end
return 0
"""

# ARGV: connection id, grace in ms.
# Lets a closed connection expire after the grace period; the reaper removes
# it then, unless the same user has connected again.
RELEASE = _REMOVE_CONNECTION + """
local expiry = now_ms() + tonumber(ARGV[2])
redis.call('ZADD', KEYS[5], 'XX', 'LT', expiry, ARGV[1])
return redis.call('ZADD', KEYS[1], 'XX', 'LT', expiry, ARGV[1])
"""

# ARGV: room key, maximum number of connections to remove, prefix of the
# per-user keys. Removes expired connections; returns the user keys that
# went offline.
REAP = _REMOVE_CONNECTION + """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[2]))
local left = {}
for _, conn in ipairs(expired) do
  local user = remove_connection(conn, ARGV[1], ARGV[3])
  if user then table.insert(left, user) end
end
return left
"""
