"""Planning without allocating: dry run, memory estimate, parameter inventory (meta builds and arithmetic)."""
