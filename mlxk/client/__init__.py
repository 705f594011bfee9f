"""The CLI's client side of the api: find or start a server (connection.py) and talk to it (repl.py: `mlxk run`'s
answers and chat, `ps`, `stop`). Nothing here runs in the api process; mlxk/server/ holds only that process.
"""
