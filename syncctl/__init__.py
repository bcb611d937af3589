"""``syncctl``: operate sync-to-device (database, topology, devices, sync calls, demo)."""

__all__: list[str] = []
