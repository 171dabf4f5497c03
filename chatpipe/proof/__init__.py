"""Proving chatpipe from the outside: `chatpipe simulate` sends realistic 8x8 traffic and writes the ground
truth, `chatpipe verify` compares the store and the read API with it.

Layout (pure core, I/O at the edges):
- `traffic`: the traffic model. Pure: a seed and a start time in, frozen dataclasses out (the webhooks in
  send order, the plan of every message). No I/O, no clock.
- `truth`: the expected outcome of every message, computed from the plan by the documented rules (never
  by chatpipe's state machine), and the truth file format (text in, text out).
- `delivery`: 8x8's retry schedule and the send pacer, pure (time is an argument).
- `compare`: truth against observed records (store or API answers), pure.
- `client`: the aiohttp sender (the only network code of `simulate`).
The commands themselves are `chatpipe.simulate` and `chatpipe.verify`.
"""
