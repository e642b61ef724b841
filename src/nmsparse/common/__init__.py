"""Small helpers every layer may use: messages and tables, the machine's description, output paths.

Nothing here imports the rest of nmsparse.
"""

__version__ = "0.1.0"
