"""Local state: what the runner keeps in its state directory across its own restarts.

`journal` (claims held, acknowledged offsets, gaps to replay), `checkpoint` (the wake
offset), `files` (atomic replacement).
"""
