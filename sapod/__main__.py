from sapod.cli import entry

entry()
