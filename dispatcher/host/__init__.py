"""This machine's processes: the embedded Redis server and the data folder's private files."""
