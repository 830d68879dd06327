"""Builds the polychromic demo's second task: "ends <rime>:" -> an English word spelled with
that ending (onset + rime), e.g. "ends ug:" -> bug, hug, mug, ... Many answers per prompt; the
verifier accepts any listed word. A different kind of task from category_letters: the answer
is built (an onset chosen, the prompt's rime copied) rather than recalled from one category.
Held-out rimes form the validation file; their words still appear in training under the
first-letter prompts ("starts b:"), so solving them means composing a known word's onset with
the prompt's rime. Run from the repository root: python3 data/make_rhymes.py"""
import json
import random

RIMES = {
    "at": "bat cat fat hat mat pat rat sat vat chat flat",
    "an": "ban can fan man pan ran tan van plan scan than",
    "ap": "cap gap lap map nap rap sap tap clap flap snap trap",
    "ag": "bag gag lag nag rag sag tag wag brag drag flag",
    "ack": "back hack jack lack pack rack sack tack black crack snack track",
    "ad": "bad dad fad had lad mad pad sad glad",
    "am": "dam ham jam ram yam clam cram slam swam",
    "ash": "bash cash dash gash hash lash mash rash crash flash smash trash",
    "ate": "date fate gate hate late mate rate crate plate skate state",
    "ake": "bake cake fake lake make rake take wake brake flake snake",
    "ame": "came dame fame game lame name same tame blame flame frame shame",
    "ail": "bail fail hail jail mail nail pail rail sail tail snail trail",
    "ain": "gain main pain rain vain brain chain drain grain plain stain train",
    "ay": "bay day hay lay may pay ray say way clay gray play pray stay tray",
    "ed": "bed fed led red wed bled fled shed sled",
    "en": "den hen men pen ten then when",
    "et": "bet get jet let met net pet set vet wet yet",
    "ell": "bell cell fell sell tell well yell shell smell spell",
    "est": "best jest nest pest rest test vest west chest crest guest quest",
    "eat": "beat heat meat neat seat cheat treat wheat",
    "eed": "deed feed heed need reed seed weed bleed breed greed speed",
    "eep": "beep deep jeep keep peep seep weep sheep sleep steep sweep creep",
    "ig": "big dig fig gig jig pig rig wig twig",
    "in": "bin fin gin kin pin sin tin win chin grin skin spin thin twin",
    "ip": "dip hip lip nip rip sip tip zip chip clip drip flip grip ship skip slip trip whip",
    "it": "bit fit hit kit lit pit sit wit knit quit spit split",
    "ick": "kick lick nick pick sick tick wick brick chick click quick stick thick trick",
    "ill": "bill fill hill kill mill pill till will chill drill grill skill spill still",
    "ing": "king ping ring sing wing bring cling fling sling sting swing thing",
    "ink": "kink link mink pink rink sink wink blink drink stink think",
    "ight": "fight light might night right sight tight bright fright flight slight",
    "ine": "dine fine line mine nine pine vine wine shine spine swine",
    "ike": "bike hike like pike spike strike",
    "ide": "hide ride side tide wide bride glide pride slide",
    "og": "bog cog dog fog hog jog log clog frog smog",
    "op": "cop hop mop pop top chop crop drop flop shop stop",
    "ot": "cot dot got hot jot lot not pot rot blot knot plot shot slot spot",
    "ock": "dock lock mock rock sock block clock flock knock shock stock",
    "ore": "bore core more pore sore tore wore chore score shore snore store",
    "ug": "bug dug hug jug lug mug pug rug tug drug plug shrug slug smug snug",
    "un": "bun fun gun nun pun run sun spun stun",
    "ut": "but cut gut hut nut rut shut strut",
    "ub": "cub hub pub rub sub tub club grub scrub stub",
    "uck": "buck duck luck muck puck suck tuck cluck pluck stuck struck truck",
    "ump": "bump dump hump jump lump pump clump plump slump stump",
    "ush": "gush hush lush mush rush blush brush crush flush plush",
    "unk": "bunk dunk hunk junk punk sunk chunk drunk skunk trunk",
    "ook": "book cook hook look nook took brook crook shook",
    "ool": "cool fool pool tool drool spool stool",
    "oom": "boom doom loom room zoom bloom broom gloom groom",
    "own": "down gown town brown clown crown drown frown",
    "out": "bout pout shout snout spout scout sprout stout trout",
    "ound": "bound found hound mound pound round sound wound ground",
    "ear": "dear fear gear hear near rear tear year clear spear",
    "oat": "boat coat goat moat bloat float gloat",
}

for rime, words in RIMES.items():
    for w in words.split():
        assert w.endswith(rime) and len(w) > len(rime), (rime, w)

rng = random.Random(11)
rimes = sorted(RIMES)
rng.shuffle(rimes)
held_out = sorted(rimes[: len(rimes) // 3])
train = sorted(rimes[len(rimes) // 3 :])
every_word = sorted({w for words in RIMES.values() for w in words.split()})

with open("data/rhymes/train.jsonl", "w") as f:
    for rime in train:
        answers = sorted(RIMES[rime].split())
        for word in answers:
            f.write(json.dumps({"prompt": f"ends {rime}:", "reply": word, "answers": answers}) + "\n")
    for letter in sorted({w[0] for w in every_word}):
        answers = [w for w in every_word if w[0] == letter]
        for word in answers:
            f.write(json.dumps({"prompt": f"starts {letter}:", "reply": word, "answers": answers}) + "\n")
with open("data/rhymes/validation.jsonl", "w") as f:
    for rime in held_out:
        answers = sorted(RIMES[rime].split())
        f.write(json.dumps({"prompt": f"ends {rime}:", "reply": answers[0], "answers": answers}) + "\n")
print(f"{len(train)} training rimes, {len(held_out)} held out: {' '.join(held_out)}; {len(every_word)} words")
