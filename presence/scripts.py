"""Lua scripts that change the Redis presence store atomically.

Keys of one room (KEYS[1..3]) and the room index (KEYS[4]):
  conns   sorted set: connection id scored by its expiry in milliseconds
  owners  hash: connection id to user key
  users   hash: user key to number of listed connections
  rooms   set: room keys that have listed connections

The expiry comes from the Redis server's clock, so nodes whose clocks
disagree still agree on what has expired. Because each script runs alone, a
connection is removed once, and a user's count reaches zero once, however
many nodes reap at the same time; so exactly one node announces each leave.
"""

# Remove one connection; return the user key when it was their last one.
_REMOVE_CONNECTION = """
local function remove_connection(conn, room)
  if redis.call('ZREM', KEYS[1], conn) == 0 then return nil end
  local user = redis.call('HGET', KEYS[2], conn)
  redis.call('HDEL', KEYS[2], conn)
  if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('SREM', KEYS[4], room) end
  if not user then return nil end
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

# ARGV: connection id, user key, ttl in ms, room key.
# Lists or refreshes a connection; returns 1 when it is the user's first.
JOIN = _REMOVE_CONNECTION + """
local expiry = now_ms() + tonumber(ARGV[3])
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
return redis.call('ZADD', KEYS[1], 'XX', 'LT', expiry, ARGV[1])
"""

# ARGV: room key, maximum number of connections to remove.
# Removes expired connections; returns the user keys that went offline.
REAP = _REMOVE_CONNECTION + """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[2]))
local left = {}
for _, conn in ipairs(expired) do
  local user = remove_connection(conn, ARGV[1])
  if user then table.insert(left, user) end
end
return left
"""
