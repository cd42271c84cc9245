from django.dispatch import Signal

# Sent when a user's first connection in a room appears or their last one is
# gone, with the keyword arguments `room` (the room key), `user` (the user
# key) and `online` (True for a join, False for a leave). Receivers may be
# async; the sender awaits them with Signal.asend.
presence_changed = Signal()
