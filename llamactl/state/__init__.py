"""Shared cluster state on Redis: the jobs stream any instance appends to and every instance consumes.

Optional and degradable: the server runs without it (in-memory jobs), and when Redis is unreachable only the
jobs API answers 503; synchronous inference never touches Redis.
"""
