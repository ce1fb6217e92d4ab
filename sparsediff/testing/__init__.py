"""Helpers shared by the tests, the CLI's tiny defaults and the demo."""
