"""Tools built on the library, for the ``dmodel`` command: never imported by the core.

``peer``    ``dmodel peer``, its JSON-lines command protocol, and :class:`PeerProcess`,
            the one parent-side driver of such a child (demo, tests, benchmarks)
``demo``    ``dmodel demo``: three peer processes tell the PyDinemic story
``home``    where a home keeps its embedded Redis (socket, pid file) for tools that
            look at a home from outside its node
"""
