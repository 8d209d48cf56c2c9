"""Single-device reference losses: the specification every optimized and sharded path is tested against."""
