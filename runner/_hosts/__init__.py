"""Hosts: a runner inside a program that is not trio (asyncio, Qt, threads).

`guest` (one hosted run, shared by every host), `asyncio_host`, `thread`
(`BackgroundRunner`); `runner.qt` is the public Qt host.
"""
