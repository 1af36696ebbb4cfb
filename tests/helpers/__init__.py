"""What the tests share, imported one way: `from tests.helpers.<subject> import name`."""
