"""The compiler pass: capture -> normalize -> match -> rewrite -> run."""
