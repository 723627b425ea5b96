"""Reading and writing files: atomic writes, and (later) the ecosystem's model formats."""
