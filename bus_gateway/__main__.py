from bus_gateway.server import main

main()
