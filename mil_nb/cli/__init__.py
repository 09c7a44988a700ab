"""The command line: `mil_nb <command>`, every command of the package under one name."""
