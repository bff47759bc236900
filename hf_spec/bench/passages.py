"""Offline text for the input-grounded task groups (summarization, question answering, extraction).

Spec-Bench (Xia et al. 2024) includes summarization, QA and RAG because their answers copy from the
input, which is where retrieval-style drafters such as prompt lookup shine. No such data set installs
from PyPI, so these short documents were written for hf_spec (fictional places, people and products,
so answers depend on the text and not on what the model memorised). They ship as Python data so that
any install of the package has them. Each passage carries one question and one extraction request.
"""

from __future__ import annotations

PASSAGES: tuple[dict[str, str], ...] = (
    {
        "id": "council-minutes",
        "kind": "meeting minutes",
        "text": (
            "Minutes of the Larkspur Falls town council, regular meeting of 14 March.\n"
            "Present: Mayor Ines Okafor, councillors Dale Pruitt, Wen Zhao, Harriet Blum and Tomas Ferreira. "
            "The meeting opened at 7:02 pm.\n"
            "1. Footbridge repair. The engineer's report puts the cost of replacing the rotten deck of the "
            "Mill Street footbridge at 186,000 dollars. Councillor Zhao moved to fund the work from the capital "
            "reserve; the motion passed 4 to 1, with Councillor Pruitt against, who asked for a second quote.\n"
            "2. Library hours. From 1 May the public library will open on Sundays from noon to 5 pm, paid for by "
            "a 22,000 dollar grant from the Hollis Foundation. Approved unanimously.\n"
            "3. Parking. A proposal to raise downtown parking meters from 1.50 to 2.00 dollars per hour was "
            "tabled until the April meeting so that shop owners can be consulted.\n"
            "4. Public comment. Two residents asked for a crosswalk near Birch Elementary School. The mayor "
            "asked staff to report on costs by 11 April.\n"
            "The meeting adjourned at 8:47 pm. The next regular meeting is on 11 April."
        ),
        "question": "How did the vote on the footbridge go, and who voted against it and why?",
        "extract": "List every amount of money in the text with what it is for, one per line, as 'amount: purpose'.",
    },
    {
        "id": "release-notes",
        "kind": "software release notes",
        "text": (
            "Tallow 3.2 release notes.\n"
            "Tallow is a command-line tool that synchronises notes between a laptop and a home server.\n"
            "New features: a `tallow watch` command that syncs a folder whenever a file changes; conflict "
            "files are now named `<note>.conflict-<date>.md` instead of `<note>.bak`; the `--dry-run` flag "
            "shows what would be copied without copying it.\n"
            "Fixes: notes with emoji in their names no longer crash the indexer (issue 412); syncing over a "
            "slow connection no longer times out after 30 seconds, the limit is now 5 minutes (issue 398); "
            "`tallow status` reports deleted notes correctly (issue 420).\n"
            "Deprecations: the `--legacy-index` flag will be removed in Tallow 4.0; the `TALLOW_HOME` "
            "variable is replaced by `TALLOW_CONFIG_DIR`, and the old name keeps working until 4.0.\n"
            "Upgrading: run `tallow migrate` once after installing 3.2; it rewrites the index in the new "
            "format and takes about one minute per ten thousand notes.\n"
            "Thanks to Priya Raman, Jonas Eklund and Mateo Silva for their contributions to this release."
        ),
        "question": "What must a user do after installing Tallow 3.2, and how long does it take?",
        "extract": "Extract every issue number mentioned, each with a one-line description of the fix.",
    },
    {
        "id": "greenhouse-experiment",
        "kind": "experiment report",
        "text": (
            "Report: basil growth under three night temperatures.\n"
            "We grew 36 basil seedlings of the same variety in three greenhouse chambers, 12 per chamber. All "
            "chambers were kept at 24 degrees Celsius during the day; at night chamber A was kept at 12 "
            "degrees, chamber B at 16 degrees and chamber C at 20 degrees. Plants received the same water and "
            "light for 42 days.\n"
            "Results: the mean plant height after 42 days was 18.4 cm in chamber A, 23.9 cm in chamber B and "
            "24.6 cm in chamber C. Mean fresh leaf mass per plant was 31 g, 47 g and 45 g. Two plants in "
            "chamber A showed purple leaf spots, which we attribute to cold stress; no plant in B or C did.\n"
            "Conclusion: night temperatures of 16 degrees or more gave clearly taller and heavier plants than "
            "12 degrees, while 20 degrees gave no meaningful gain over 16 degrees. Since heating chamber C "
            "used 38 percent more energy than chamber B, we recommend 16 degrees at night for basil.\n"
            "Authors: L. Moreau and K. Adeyemi, Fernhill Agricultural Station."
        ),
        "question": "Which night temperature do the authors recommend, and what two reasons do they give?",
        "extract": "Make a table with one row per chamber and columns: chamber, night temperature, mean height, "
                   "mean leaf mass.",
    },
    {
        "id": "outage-report",
        "kind": "incident report",
        "text": (
            "Incident report: checkout outage on the Parcelwise web shop, Saturday 9 November.\n"
            "Summary: customers could not complete purchases for 47 minutes.\n"
            "Timeline (all times UTC): 10:12 a configuration change raised the database connection limit "
            "from 200 to 2,000. 10:31 the payment service began returning errors as the database ran out of "
            "memory. 10:35 the on-call engineer, Ruth Castellanos, was paged. 10:52 the team identified the "
            "configuration change as the cause. 11:05 the change was rolled back. 11:18 checkout error rates "
            "returned to normal.\n"
            "Impact: about 3,400 checkout attempts failed; no payment was charged twice and no data was "
            "lost.\n"
            "Root cause: each database connection reserves memory, and the new limit allowed more "
            "connections than the server's memory could hold. The change had been tested only on a "
            "staging server with a quarter of production traffic.\n"
            "Actions: configuration changes to the database now need a second reviewer; a load test at full "
            "production traffic becomes part of the release checklist; an alert will fire when database "
            "memory use passes 85 percent."
        ),
        "question": "What caused the outage, and why did testing not catch it?",
        "extract": "Extract the timeline as a list of 'time - event' lines.",
    },
    {
        "id": "library-policy",
        "kind": "library policy",
        "text": (
            "Borrowing rules of the Quillmoor Public Library, effective 1 September.\n"
            "Who can borrow: anyone who lives, works or studies in Quillmoor county can get a free library "
            "card by showing a photo ID and proof of address. Children under 14 need a parent or guardian "
            "to sign the application.\n"
            "Limits: adults may borrow up to 25 items at a time, children up to 10. Books and audiobooks are "
            "lent for 21 days, DVDs and video games for 7 days, and laptops for 3 days; laptops must stay in "
            "the county.\n"
            "Renewals: items can be renewed twice online or at the desk, unless another patron has reserved "
            "them. Laptops cannot be renewed.\n"
            "Late items: there are no fines for late books. Late laptops cost 5 dollars per day. An item 30 "
            "days overdue is considered lost, and the card is blocked until it is returned or paid for.\n"
            "Opening hours: Monday to Thursday 9 am to 8 pm, Friday and Saturday 9 am to 5 pm, closed on "
            "Sundays and public holidays. The book drop outside the main entrance is open at all times."
        ),
        "question": "Can a child borrow a laptop for a week, and what happens if it comes back late?",
        "extract": "Extract the loan period of each type of item as 'item: days'.",
    },
    {
        "id": "bread-recipe",
        "kind": "recipe",
        "text": (
            "Grandmother Aino's rye and oat bread (makes two loaves).\n"
            "The evening before, stir 300 g of dark rye flour into 400 ml of lukewarm water with 50 g of rye "
            "sourdough starter, cover, and leave it at room temperature for 12 to 16 hours.\n"
            "In the morning, add 250 g of strong wheat flour, 100 g of rolled oats, 2 tablespoons of dark "
            "syrup, 15 g of salt and another 150 ml of water. Knead for about 10 minutes; the dough will stay "
            "sticky, so wet your hands rather than adding flour.\n"
            "Let the dough rise in a warm place for 2 hours. Divide it in two, shape two round loaves, roll "
            "them in oats and place them on a tray lined with baking paper. Let them rise for another 45 "
            "minutes while the oven heats to 230 degrees Celsius.\n"
            "Bake for 10 minutes at 230 degrees, then lower the oven to 200 degrees and bake for 35 minutes "
            "more. The loaves are done when they sound hollow when tapped underneath. Brush them with hot "
            "water as they come out of the oven and let them cool on a rack for at least an hour before "
            "slicing."
        ),
        "question": "How long does the bread bake in total, and at which temperatures?",
        "extract": "List every ingredient with its quantity, one per line.",
    },
    {
        "id": "travel-itinerary",
        "kind": "travel itinerary",
        "text": (
            "Hi Sam, here is the plan for the conference trip.\n"
            "Outbound: Tuesday 3 June, flight NV 218 leaves Westbrook at 07:40 and lands in Port Elnor at "
            "10:15. A shuttle from the Halcyon Hotel meets the flight; look for the driver holding a green "
            "sign.\n"
            "Hotel: Halcyon Hotel, 14 Quay Road, three nights (3 to 6 June), booking reference HX-5521. "
            "Breakfast is included; the conference centre is an eight-minute walk along the harbour.\n"
            "Conference: registration opens Tuesday at 13:00. Your talk is on Wednesday 4 June at 11:30 in "
            "room B, 25 minutes plus 5 for questions. The speakers' dinner is Wednesday at 19:30 at the "
            "Lantern restaurant.\n"
            "Return: Friday 6 June, flight NV 225 leaves Port Elnor at 16:50 and lands in Westbrook at 19:20. "
            "Checkout is at 11:00; the hotel will keep your luggage until you leave for the airport.\n"
            "Budget: meals not covered by the conference are reimbursed up to 60 per day; keep receipts. "
            "Call me on 555 0147 if anything changes. Best, Noor"
        ),
        "question": "When and where is Sam's talk, and how long is it?",
        "extract": "Extract the two flights as 'flight number, date, departure time, arrival time'.",
    },
    {
        "id": "engineer-profile",
        "kind": "biography",
        "text": (
            "Marta Keldorf (born 1941) is a civil engineer known for light footbridges in the fictional "
            "river city of Osterhaven.\n"
            "She studied structural engineering at the Osterhaven Polytechnic, graduating in 1964, and joined "
            "the city's bridge department in 1966. Her first design, the Tanners' Footbridge of 1971, used "
            "thin steel cables to carry a deck only 18 centimetres thick across 64 metres of water. Critics "
            "called it too fragile; it has carried pedestrians every day since.\n"
            "In 1979 she founded her own practice, Keldorf and Partners, with two former colleagues. The firm "
            "designed eleven bridges over the next thirty years, the largest being the 210-metre Harbour Arc "
            "of 1994, which won the national design prize in 1995.\n"
            "Keldorf taught bridge design at the Polytechnic from 1985 to 2006 and wrote the textbook "
            "'Light Structures over Water' (1998), still used in several countries. She retired in 2009 and "
            "now chairs a foundation that funds scholarships for engineering students from rural areas."
        ),
        "question": "What was Keldorf's first design and how was it received?",
        "extract": "Extract every year in the text with the event that happened in it, as 'year: event', in "
                   "chronological order.",
    },
    {
        "id": "job-posting",
        "kind": "job posting",
        "text": (
            "Brightwater Transit is hiring a Data Engineer (full time, hybrid).\n"
            "About the team: the six-person data team builds the pipelines behind bus arrival predictions, "
            "ridership reports and the open data portal used by about 40 local apps.\n"
            "What you will do: maintain the pipelines that ingest vehicle positions every 15 seconds from "
            "900 buses; move the nightly reports from cron jobs to a workflow scheduler; improve data "
            "quality checks; publish clear documentation for the open data portal.\n"
            "What we look for: at least three years of experience with Python and SQL; experience with a "
            "workflow scheduler such as Airflow or Dagster; comfort with Linux servers. Experience with "
            "geographic data is a plus but not required.\n"
            "Pay and benefits: 78,000 to 92,000 dollars a year depending on experience, 25 days of paid "
            "leave, a free transit pass and a 1,500 dollar yearly training budget.\n"
            "Location: the office is at 200 Depot Street, Brightwater; the team works there on Tuesdays and "
            "Thursdays. Apply by 30 June with a CV and a short note about a data problem you solved."
        ),
        "question": "Which experience is required and which is only a plus?",
        "extract": "Extract the benefits and the salary range as a bulleted list.",
    },
    {
        "id": "museum-exhibit",
        "kind": "museum exhibit description",
        "text": (
            "Gallery 4: Clocks that travelled. The Varnholt Museum of Timekeeping.\n"
            "Before radio time signals, ships found their longitude by comparing local noon with the time at "
            "their home port, kept by a marine chronometer. This gallery shows nine chronometers that crossed "
            "the oceans between 1790 and 1910.\n"
            "The oldest, made by the workshop of Elias Brandt in 1792, lost only four seconds a day on a "
            "voyage of seven months, which was remarkable for its time. The largest, from 1868, sat in a "
            "gimballed wooden box so that it stayed level as the ship rolled. Case 6 holds a chronometer "
            "that survived the wreck of the merchant ship Calloway in 1883; it was found still running by "
            "the crew of a fishing boat, a story told in the logbook displayed beside it.\n"
            "Visitors can wind a working replica in the centre of the room and listen to its ticking through "
            "headphones. Guided tours of the gallery start at 11:00 and 15:00 every day except Monday and "
            "last about 40 minutes. Photography without flash is allowed."
        ),
        "question": "How did ships use chronometers to find their longitude?",
        "extract": "Extract every chronometer that the text describes individually, with its year and what is "
                   "special about it.",
    },
)
