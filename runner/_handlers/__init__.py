"""Handlers: what user code is given (`Batch`) and how it is called. Knows nothing of HTTP.

`batch` (the types a handler sees), `calling` (one calling convention; `module:function`
references), `command` (external commands as handlers), `bridge` (asyncio handlers, and the
batch observers a host plugs in).
"""
