import sys

from image_search_client.cli import main

sys.exit(main())
