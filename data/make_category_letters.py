"""Builds the polychromic demo task: "<category> <letter>:" -> a word of that category starting
with that letter. Many answers per prompt; the verifier accepts any listed word. Held-out
(category, letter) combinations form the validation file; their words still appear in training
under the any-letter prompt ("animal *:"), so solving them means composing category and letter.
Run from the repository root: python3 data/make_category_letters.py"""
import json
import random

WORDS = {
    "animal": "ant ape antelope alligator alpaca bear bee bison bat beaver buffalo cat cow camel crab crow cobra "
    "deer dog duck dove dingo eagle eel elk emu elephant fox frog fly falcon ferret goat goose gecko gorilla giraffe "
    "horse hare hen hawk hippo lion lamb llama lizard lynx mole mouse moth mule monkey owl otter ox oyster orca "
    "pig panda parrot pony puma rat rabbit raven robin rhino seal snake swan shark sheep tiger toad trout turkey tuna "
    "wolf whale wasp worm walrus",
    "food": "apple apricot avocado almond banana bread bean berry butter cake carrot cherry cheese corn garlic grape "
    "guava lemon lime lentil mango melon milk olive onion orange oat pear peach plum pasta pie rice radish raisin "
    "salt soup steak sugar tea toast tomato tofu",
    "country": "angola albania algeria austria argentina belgium brazil bolivia benin canada chile china cuba chad "
    "egypt ecuador estonia france finland fiji germany ghana greece guinea haiti hungary honduras india iran iraq "
    "italy ireland japan jordan jamaica kenya korea kuwait laos latvia libya lebanon mali malta mexico morocco nepal "
    "niger norway peru poland panama spain sweden syria sudan togo tunisia turkey",
    "name": "alice anna adam amy bob ben bella carl cara chris dan dave diana emma eric ella frank fred fiona grace "
    "gus gina henry hugo hanna ivan iris ida jack jane john kate kim kyle leo lily luke mary max mia nick nina noah "
    "olga oscar owen paul pete rose ryan ruby sam sara sean tom tina ted",
    "city": "amsterdam athens atlanta austin berlin boston bangkok bristol cairo chicago cologne dallas delhi denver "
    "dublin geneva genoa glasgow hamburg havana houston kyoto kabul kiev lagos leeds lima lisbon london madrid miami "
    "milan moscow munich naples nice oslo ottawa paris perth prague rome riga seoul sydney seattle tokyo toronto turin "
    "venice vienna warsaw",
    "job": "actor artist author baker banker barber builder butcher carpenter chef clerk cook coach dancer dentist "
    "designer doctor driver editor engineer farmer fireman gardener guard judge lawyer manager mechanic miner nurse "
    "painter pilot plumber poet police porter priest sailor singer soldier surgeon tailor teacher tutor waiter writer",
    "body": "ankle arm back belly brain brow cheek chest chin ear elbow eye face finger foot hand head heart heel hip "
    "jaw knee leg lip liver lung mouth nail neck nose palm rib scalp shin skin skull spine thigh thumb toe tongue "
    "tooth waist wrist",
    "sport": "archery badminton baseball basketball boxing bowling chess cricket cycling darts diving fencing football "
    "golf gymnastics hockey hurling judo karate rowing rugby running sailing skating skiing soccer squash surfing "
    "swimming tennis volleyball wrestling",
}

rng = random.Random(7)
combos = []
for category, words in WORDS.items():
    words = words.split()
    for letter in sorted({w[0] for w in words}):
        answers = sorted(w for w in words if w[0] == letter)
        if len(answers) >= 3:
            combos.append((category, letter, answers))
rng.shuffle(combos)
held_out = combos[: len(combos) // 4]
train = combos[len(combos) // 4 :]

with open("data/category_letters/train.jsonl", "w") as f:
    for category, letter, answers in sorted(train):
        for word in answers:
            f.write(json.dumps({"prompt": f"{category} {letter}:", "reply": word, "answers": answers}) + "\n")
    for category, words in WORDS.items():
        words = sorted(words.split())
        for word in words:
            f.write(json.dumps({"prompt": f"{category} *:", "reply": word, "answers": words}) + "\n")
with open("data/category_letters/validation.jsonl", "w") as f:
    for category, letter, answers in sorted(held_out):
        f.write(json.dumps({"prompt": f"{category} {letter}:", "reply": answers[0], "answers": answers}) + "\n")
print(f"{len(train)} training combinations, {len(held_out)} held out")
