"""The operator CLI: thin typer commands over library functions."""
