from blockmirror.cli.main import entry

entry()
