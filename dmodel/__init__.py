"""dmodel: a decentralized object-model ORM. See README.md."""

__version__ = "0.1.0"
