"""The end-to-end main job: a loopback cloud service plus the device client, in one command."""
