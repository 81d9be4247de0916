"""Pure planners: no sockets, no subprocess, no clock. They return commands and rendered files."""
