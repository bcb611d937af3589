from device_agent.cli import main

main()
