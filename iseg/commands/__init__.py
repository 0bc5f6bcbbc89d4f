"""The command line: ``iseg COMMAND`` (``main``), its shared options (``options``), atomic file
writes (``files``), and the commands that are not part of another sub-package (``segment``,
``bench``). The method never imports this package."""
